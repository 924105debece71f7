//! The hand-written man pages in `man/` document exactly the flags the binaries have
//! (STYLE rules 32 and 33): every `mvps-te` flag, its `MVPS_TE_*` variable and its default
//! appear in `man/mvps-te.8`, every `mvpsctl token` option and its default in
//! `man/mvpsctl.1`, and neither page's OPTIONS section names a flag that does not exist.
//! The pages must also format without groff warnings.
//!
//! The roff is reduced to plain text by a small renderer below (escapes such as `\-` and
//! `\fB`, and the font-alternating macros `.BR`, `.IR`, ...), enough for these checks.

use argh::FromArgs;
use mvps::config::{env_name, Config, FLAGS};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

const SERVER_PAGE: &str = "man/mvps-te.8";
const CTL_PAGE: &str = "man/mvpsctl.1";

/// The sections each page must have, in this order (ripgrep's order, then ours).
const SERVER_SECTIONS: &[&str] = &[
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "ENVIRONMENT",
    "EXPORT NAMES",
    "NBD PROTOCOL",
    "TRANSACTIONS",
    "DURABILITY",
    "FILES",
    "SIGNALS",
    "EXIT STATUS",
    "EXAMPLES",
    "SEE ALSO",
];
const CTL_SECTIONS: &[&str] = &[
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "ENVIRONMENT",
    "EXIT STATUS",
    "EXAMPLES",
    "SEE ALSO",
];

/// Flags argh adds to every command.
const BUILTIN_FLAGS: &[&str] = &["help"];

// ------------------------------------------------------------------------------ roff → text

/// Replaces roff escapes with the characters they print; drops font changes and zero-width
/// escapes.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('-') => out.push('-'),
            Some('e') | Some('\\') => out.push('\\'),
            Some(' ') | Some('~') => out.push(' '),
            Some('&') | Some('%') | Some('c') | Some('/') | Some(',') => {}
            Some('f') => match chars.next() {
                Some('(') => {
                    chars.next();
                    chars.next();
                }
                Some('[') => {
                    for c in chars.by_ref() {
                        if c == ']' {
                            break;
                        }
                    }
                }
                _ => {}
            },
            Some('(') => {
                let name: String = chars.by_ref().take(2).collect();
                out.push_str(match name.as_str() {
                    "ha" => "^",
                    "ti" => "~",
                    "aq" => "'",
                    "ga" => "`",
                    "lq" | "rq" | "dq" => "\"",
                    "em" | "en" => "-",
                    "mi" => "-",
                    _ => "?",
                });
            }
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Splits a macro line's arguments the way roff does: on spaces, except inside double quotes
/// or after a backslash.
fn macro_args(s: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut started = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
                started = true;
            }
            '"' => {
                quoted = !quoted;
                started = true;
            }
            ' ' | '\t' if !quoted => {
                if started {
                    args.push(std::mem::take(&mut cur));
                    started = false;
                }
            }
            _ => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        args.push(cur);
    }
    args
}

#[derive(Debug)]
enum Line {
    /// A request that only structures the page: `.TP`, `.PP`, `.SH NAME`, ...
    Request { name: String, text: String },
    /// Printed text (from a text line or a font macro such as `.BR`).
    Text(String),
}

fn render(roff: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    for raw in roff.lines() {
        let Some(rest) = raw.strip_prefix('.').or_else(|| raw.strip_prefix('\'')) else {
            lines.push(Line::Text(unescape(raw)));
            continue;
        };
        if rest.starts_with("\\\"") || rest.trim().is_empty() {
            continue; // comment, or an empty request
        }
        let (name, args) = rest.split_once([' ', '\t']).unwrap_or((rest, ""));
        let args: Vec<String> = macro_args(args).iter().map(|a| unescape(a)).collect();
        match name {
            "B" | "I" | "SM" | "SB" => lines.push(Line::Text(args.join(" "))),
            "BR" | "RB" | "IR" | "RI" | "BI" | "IB" => lines.push(Line::Text(args.concat())),
            _ => lines.push(Line::Request {
                name: name.to_string(),
                text: args.join(" "),
            }),
        }
    }
    lines
}

struct Section {
    name: String,
    lines: Vec<Line>,
}

impl Section {
    fn text(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            if let Line::Text(t) = l {
                s.push_str(t);
                s.push(' ');
            }
        }
        s
    }

    /// `.TP` items: (tag, tag and body text). A body ends at the next `.TP`, `.PP`, `.SS`.
    fn items(&self) -> Vec<(String, String)> {
        let mut items: Vec<(String, String)> = Vec::new();
        let mut state = 0; // 0: outside an item, 1: expecting the tag, 2: in the body
        for l in &self.lines {
            match l {
                Line::Request { name, .. } if name == "TP" => state = 1,
                Line::Request { name, .. }
                    if ["PP", "LP", "P", "SS", "IP"].contains(&name.as_str()) =>
                {
                    state = 0
                }
                Line::Request { .. } => {}
                Line::Text(t) if state == 1 => {
                    items.push((t.trim().to_string(), t.clone()));
                    state = 2;
                }
                Line::Text(t) if state == 2 => {
                    let body = &mut items.last_mut().unwrap().1;
                    body.push(' ');
                    body.push_str(t);
                }
                Line::Text(_) => {}
            }
        }
        items
    }
}

struct Page {
    path: &'static str,
    title: String,
    sections: Vec<Section>,
}

impl Page {
    fn load(path: &'static str) -> Page {
        let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
        let roff = std::fs::read_to_string(&full)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()));
        let mut title = String::new();
        let mut sections: Vec<Section> = Vec::new();
        for l in render(&roff) {
            match l {
                Line::Request { name, text } if name == "TH" => title = text,
                Line::Request { name, text } if name == "SH" => sections.push(Section {
                    name: text,
                    lines: Vec::new(),
                }),
                l => {
                    if let Some(s) = sections.last_mut() {
                        s.lines.push(l);
                    }
                }
            }
        }
        Page {
            path,
            title,
            sections,
        }
    }

    fn section(&self, name: &str) -> &Section {
        self.sections
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{}: no {name} section", self.path))
    }

    fn check_sections(&self, wanted: &[&str]) {
        let have: Vec<&str> = self.sections.iter().map(|s| s.name.as_str()).collect();
        let mut it = have.iter();
        for w in wanted {
            assert!(
                it.any(|h| h == w),
                "{}: section {w} missing or out of order; want {wanted:?} in this order, have {have:?}",
                self.path
            );
        }
    }

    fn check_version(&self) {
        let want = format!("mvps {}", env!("CARGO_PKG_VERSION"));
        assert!(
            self.title.contains(&want),
            "{}: .TH line {:?} should name {want:?} (the package version)",
            self.path,
            self.title
        );
    }
}

/// Every `--flag` in `text`, longest match (so `--image-store` is not found in
/// `--image-store-s3-bucket`).
fn long_flags(text: &str) -> Vec<String> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 2 < b.len() {
        let boundary = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'-');
        if boundary && b[i] == b'-' && b[i + 1] == b'-' && b[i + 2].is_ascii_lowercase() {
            let start = i + 2;
            let mut end = start;
            while end < b.len()
                && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'-')
            {
                end += 1;
            }
            out.push(text[start..end].trim_end_matches('-').to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `text` holds `needle` with no letter, digit or `-`, `_` right after it.
fn contains_word(text: &str, needle: &str) -> bool {
    text.match_indices(needle).any(|(i, _)| {
        text[i + needle.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    })
}

// ----------------------------------------------------------------------------- --help text

/// argh `--help` output → (flag, description) for each option, continuation lines joined.
fn help_options(help: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut in_options = false;
    for line in help.lines() {
        if line.trim_end() == "Options:" {
            in_options = true;
            continue;
        }
        if !in_options {
            continue;
        }
        if line.trim().is_empty() {
            break;
        }
        if let Some(rest) = line.strip_prefix("  --") {
            let (flag, desc) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            out.push((
                flag.trim_end_matches(',').to_string(),
                desc.trim().to_string(),
            ));
        } else if let Some(last) = out.last_mut() {
            last.1.push(' ');
            last.1.push_str(line.trim());
        }
    }
    assert!(
        !out.is_empty(),
        "no options found in this --help output:\n{help}"
    );
    out
}

/// The value after `(default ` in a help description, e.g. `60000`, `./mvps-data`, `30d`.
/// `None` when the description has no such value (`local (default) or s3`).
fn help_default(desc: &str) -> Option<String> {
    let (_, rest) = desc.split_once("(default ")?;
    let v: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && !"();".contains(*c))
        .collect();
    let v = v.trim_end_matches([':', ',', '.']).to_string();
    (!v.is_empty()).then_some(v)
}

fn server_help() -> String {
    match Config::from_args(&["mvps-te"], &["--help"]) {
        Err(e) => e.output,
        Ok(_) => panic!("--help parsed as a configuration"),
    }
}

fn token_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mvpsctl"))
        .args(["token", "--help"])
        .output()
        .expect("run mvpsctl token --help");
    assert!(out.status.success(), "mvpsctl token --help failed: {out:?}");
    String::from_utf8(out.stdout).expect("--help is UTF-8")
}

// ---------------------------------------------------------------------------------- checks

/// Checks an OPTIONS section against a command's flags: one item per flag (with `--help`),
/// no flag mentioned that does not exist, and each flag's default stated as `Default: X`.
fn check_options(page: &Page, flags: &[(String, String)], extra_sections: &[&str]) {
    let known: BTreeSet<&str> = flags.iter().map(|(f, _)| f.as_str()).collect();
    let options = page.section("OPTIONS");
    let items = options.items();

    let mut documented = Vec::new();
    for (tag, body) in &items {
        let tag_flags = long_flags(tag);
        let first = tag_flags
            .first()
            .unwrap_or_else(|| panic!("{}: OPTIONS item {tag:?} names no --flag", page.path));
        documented.push((first.clone(), body.clone()));
    }
    for (flag, _) in flags {
        let n = documented.iter().filter(|(f, _)| f == flag).count();
        assert_eq!(
            n, 1,
            "{}: OPTIONS should have exactly one item for --{flag}, has {n}",
            page.path
        );
    }

    for section in std::iter::once("OPTIONS").chain(extra_sections.iter().copied()) {
        for f in long_flags(&page.section(section).text()) {
            assert!(
                known.contains(f.as_str()),
                "{}: {section} mentions --{f}, which is not a flag (known: {known:?})",
                page.path
            );
        }
    }

    for (flag, desc) in flags {
        if BUILTIN_FLAGS.contains(&flag.as_str()) || flag == "version" {
            continue;
        }
        let body = &documented.iter().find(|(f, _)| f == flag).unwrap().1;
        assert!(
            body.to_ascii_lowercase().contains("default"),
            "{}: --{flag} should state its default (rule 33), or say it has none",
            page.path
        );
        if let Some(d) = help_default(desc) {
            assert!(
                contains_word(body, &format!("Default: {d}")),
                "{}: --{flag}: --help says the default is {d:?}, the page does not say \
                 \"Default: {d}\":\n{body}",
                page.path
            );
        }
    }
}

#[test]
fn server_page_sections_and_version() {
    let page = Page::load(SERVER_PAGE);
    page.check_sections(SERVER_SECTIONS);
    page.check_version();
}

#[test]
fn server_page_documents_every_flag_and_only_those() {
    let page = Page::load(SERVER_PAGE);
    let help = help_options(&server_help());
    // FLAGS is what the environment merge uses; --help is what argh parses. Both must be
    // covered (the config unit test keeps them equal).
    for (flag, _) in FLAGS {
        assert!(
            help.iter().any(|(f, _)| f == flag),
            "FLAGS has --{flag}, --help does not"
        );
    }
    check_options(&page, &help, &["ENVIRONMENT"]);
}

#[test]
fn server_page_documents_every_environment_variable() {
    let page = Page::load(SERVER_PAGE);
    let env = page.section("ENVIRONMENT");
    let items = env.items();
    let item = |var: &str| {
        items
            .iter()
            .find(|(tag, _)| tag == var)
            .map(|(_, body)| body.clone())
    };

    let mut wanted = BTreeSet::new();
    for (flag, _) in FLAGS {
        let var = env_name("MVPS_TE_", flag);
        let body = item(&var).unwrap_or_else(|| {
            panic!("{SERVER_PAGE}: ENVIRONMENT has no item for {var} (--{flag})")
        });
        assert!(
            long_flags(&body).iter().any(|f| f == flag),
            "{SERVER_PAGE}: the ENVIRONMENT item {var} should refer to --{flag}:\n{body}"
        );
        wanted.insert(var);
    }
    for var in [
        "MVPS_TE_JWT_SECRET",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "S3_ENDPOINT",
    ] {
        assert!(
            item(var).is_some(),
            "{SERVER_PAGE}: ENVIRONMENT has no item for {var}"
        );
    }
    for (tag, _) in &items {
        if tag.starts_with("MVPS_TE_") {
            assert!(
                wanted.contains(tag),
                "{SERVER_PAGE}: ENVIRONMENT documents {tag}, which no flag reads"
            );
        }
    }
}

#[test]
fn ctl_page_documents_every_token_option_and_only_those() {
    let page = Page::load(CTL_PAGE);
    page.check_sections(CTL_SECTIONS);
    page.check_version();
    let help = help_options(&token_help());
    check_options(&page, &help, &[]);
    let synopsis = long_flags(&page.section("SYNOPSIS").text());
    for (flag, _) in &help {
        assert!(
            synopsis.contains(flag),
            "{CTL_PAGE}: SYNOPSIS lacks --{flag}"
        );
    }
    let env = page.section("ENVIRONMENT").items();
    assert!(
        env.iter().any(|(tag, _)| tag == "MVPS_TE_JWT_SECRET"),
        "{CTL_PAGE}: ENVIRONMENT has no item for MVPS_TE_JWT_SECRET"
    );
}

/// `groff -man -ww -z` prints nothing for a clean page. groff comes with man-db
/// (Debian package groff-base).
#[test]
fn pages_format_without_groff_warnings() {
    for path in [SERVER_PAGE, CTL_PAGE] {
        let full = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path);
        let out = Command::new("groff")
            .args(["-man", "-ww", "-z"])
            .arg(&full)
            .output()
            .unwrap_or_else(|e| panic!("cannot run groff ({e}): install groff-base"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{path}: groff warnings:\n{stderr}"
        );
    }
}

// ------------------------------------------------------------------- the checks' own tests

#[test]
fn renderer_and_parsers() {
    assert_eq!(
        unescape(r"\fB\-\-listen\fR \fIADDR\fP \(ha\e"),
        r"--listen ADDR ^\"
    );
    let lines = render(".BR \\-\\-a \", \" \\-\\-b\n.IR <x> /y.\n.\\\" comment\nplain \\-\\-c\n");
    let text: Vec<String> = lines
        .iter()
        .filter_map(|l| {
            if let Line::Text(t) = l {
                Some(t.clone())
            } else {
                None
            }
        })
        .collect();
    assert_eq!(text, vec!["--a, --b", "<x>/y.", "plain --c"]);
    assert_eq!(
        long_flags("--image-store s3, --x=1 a--b ---"),
        vec!["image-store", "x"]
    );
    assert!(contains_word("Default: 12 (4 KiB)", "Default: 12"));
    assert!(!contains_word("Default: 123", "Default: 12"));
    assert_eq!(
        help_default("log2, 9..=16 (default 12: 4 KiB pages)").as_deref(),
        Some("12")
    );
    assert_eq!(
        help_default("x (default 127.0.0.1:10809)").as_deref(),
        Some("127.0.0.1:10809")
    );
    assert_eq!(
        help_default("(default 268435456; unused)").as_deref(),
        Some("268435456")
    );
    assert_eq!(help_default("local (default) or s3"), None);
    let h = "Usage: x\n\nOptions:\n  --a-b             one\n                    two\n  --long-flag-name\n                    three\n  --help, help      display\n\n";
    assert_eq!(
        help_options(h),
        vec![
            ("a-b".to_string(), "one two".to_string()),
            ("long-flag-name".to_string(), " three".to_string()),
            ("help".to_string(), "help      display".to_string()),
        ]
    );
}
