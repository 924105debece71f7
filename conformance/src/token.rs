//! Export-name tokens: good ones signed with the test secret, and deliberately bad ones.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mvps::auth::Claims;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The secret every test server is started with (`MVPS_TE_JWT_SECRET`).
pub const SECRET: &str = "conformance-secret-not-for-production";

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// A fresh valid image id, unique within this process: `<tag>-<pid>-<n>.mvps-image`.
pub fn image_id(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{tag}-{}-{}.mvps-image",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Claims for `image_id` of `image_size` bytes, 4 KiB pages, valid for an hour.
pub fn claims(image_id: &str, image_size: u64) -> Claims {
    Claims {
        image_id: image_id.into(),
        image_size,
        page_size_bits: 12,
        exp: now() + 3600,
        client_id: None,
    }
}

/// A valid token for `image_id` of `image_size` bytes.
pub fn token(image_id: &str, image_size: u64) -> String {
    mint(&claims(image_id, image_size))
}

/// Signs `c` with [`SECRET`] through the project's own `mvps::auth::mint`.
pub fn mint(c: &Claims) -> String {
    mvps::auth::mint(c, SECRET.as_bytes()).expect("minting a valid token")
}

/// Signs any claims (even ones `mint` refuses, such as a bad image id) with HS256 and `secret`.
pub fn sign_unchecked(c: &Claims, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        c,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encoding a JWT")
}

/// An unsigned token: header `{"alg":"none","typ":"JWT"}`, the claims, an empty signature.
pub fn alg_none(c: &Claims) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(&serde_json::to_vec(c).expect("claims to JSON"));
    format!("{header}.{payload}.")
}

/// The claims of `c` under an HS256 header, but the signature of a different token: a
/// well-formed token whose signature does not match.
pub fn bad_signature(c: &Claims) -> String {
    let good = sign_unchecked(c, "some-other-secret");
    let (head, sig) = good.rsplit_once('.').expect("three parts");
    let flipped: String = sig.chars().rev().collect();
    format!("{head}.{flipped}")
}

/// Unpadded base64url (RFC 4648 §5), as JWTs use.
pub fn base64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc4648_vectors() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn bad_tokens_do_not_verify_but_good_ones_do() {
        let c = claims(&image_id("t"), 1 << 20);
        assert_eq!(
            mvps::auth::verify(&token(&c.image_id, 1 << 20), SECRET.as_bytes()).unwrap(),
            c
        );
        assert!(mvps::auth::verify(&bad_signature(&c), SECRET.as_bytes()).is_err());
        assert!(mvps::auth::verify(&alg_none(&c), SECRET.as_bytes()).is_err());
        // The unsigned token is otherwise well formed: same payload as a signed one.
        assert_eq!(
            alg_none(&c).split('.').nth(1),
            token(&c.image_id, 1 << 20).split('.').nth(1)
        );
    }
}
