//! mvpsctl: operator tool for mvps.

use argh::FromArgs;
use mvps::auth::{self, Claims};
use std::time::{SystemTime, UNIX_EPOCH};

/// mvps operator tool.
#[derive(FromArgs)]
struct Top {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Token(TokenCmd),
}

/// Print an export-name token (HS256 JWT) signed with MVPS_TE_JWT_SECRET.
#[derive(FromArgs)]
#[argh(subcommand, name = "token")]
struct TokenCmd {
    /// image id, e.g. disk1.mvps-image (must match ^[0-9a-zA-Z_-]{1,64}\.mvps-image$)
    #[argh(option)]
    image_id: String,
    /// image size in bytes, or with a unit: 512M, 1G, 2T (binary units)
    #[argh(option)]
    size: String,
    /// log2 of the page size, 9..=16 (default 12: 4 KiB pages)
    #[argh(option, default = "12")]
    page_size_bits: u32,
    /// optional client id: a new connection with the same id replaces the old one
    #[argh(option)]
    client_id: Option<String>,
    /// lifetime of the token: seconds, or with a unit s, m, h, d (default 30d)
    #[argh(option, default = "String::from(\"30d\")")]
    ttl: String,
}

fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown duration unit in {s:?} (use s, m, h or d)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("duration {s:?} overflows"))
}

fn token(t: TokenCmd) -> Result<(), String> {
    let secret = std::env::var("MVPS_TE_JWT_SECRET")
        .map_err(|_| "MVPS_TE_JWT_SECRET is not set; export the server's secret".to_string())?;
    if secret.is_empty() {
        return Err("MVPS_TE_JWT_SECRET is empty".into());
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs();
    let claims = Claims {
        image_id: t.image_id,
        image_size: auth::parse_size(&t.size)?,
        page_size_bits: t.page_size_bits,
        exp: now.saturating_add(parse_duration_secs(&t.ttl)?),
        client_id: t.client_id,
    };
    let tok = auth::mint(&claims, secret.as_bytes()).map_err(|e| e.to_string())?;
    println!("{tok}");
    Ok(())
}

fn main() {
    let top: Top = argh::from_env();
    let r = match top.cmd {
        Cmd::Token(t) => token(t),
    };
    if let Err(e) = r {
        eprintln!("mvpsctl: {e}");
        std::process::exit(1);
    }
}
