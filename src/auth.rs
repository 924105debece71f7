//! Export names are HS256 JWTs signed with the server's secret (DESIGN §6).
//!
//! The algorithm is pinned to HS256: `alg: none`, RS/HS confusion and every other algorithm
//! are refused by the validator. `exp` is required. Errors never echo the token.

use crate::catalog::keys::is_valid_image_id;
use crate::limits::{EXPORT_NAME_LENGTH_MAX, PAGE_SIZE_BITS_MAX, PAGE_SIZE_BITS_MIN};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Claims carried by an export name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub image_id: String,
    pub image_size: u64,
    pub page_size_bits: u32,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// Why a token was refused. Safe to log: contains no part of the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    TooLong,
    /// Signature, algorithm, encoding, expiry or missing claims (from the JWT library).
    Invalid(String),
    BadImageId,
    BadPageSize(u32),
    BadImageSize {
        image_size: u64,
        page_size: u64,
    },
    BadClientId,
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::TooLong => write!(f, "token longer than {EXPORT_NAME_LENGTH_MAX} bytes"),
            TokenError::Invalid(why) => write!(f, "invalid token: {why}"),
            TokenError::BadImageId => {
                write!(
                    f,
                    "image_id does not match ^[0-9a-zA-Z_-]{{1,64}}\\.mvps-image$"
                )
            }
            TokenError::BadPageSize(b) => write!(
                f,
                "page_size_bits {b} outside {PAGE_SIZE_BITS_MIN}..={PAGE_SIZE_BITS_MAX}"
            ),
            TokenError::BadImageSize {
                image_size,
                page_size,
            } => write!(
                f,
                "image_size {image_size} is not a positive multiple of the page size {page_size}"
            ),
            TokenError::BadClientId => write!(f, "client_id must be 1..=128 printable characters"),
        }
    }
}

impl std::error::Error for TokenError {}

fn validation() -> Validation {
    let mut v = Validation::new(Algorithm::HS256);
    v.algorithms = vec![Algorithm::HS256];
    v.set_required_spec_claims(&["exp"]);
    v.validate_exp = true;
    v.leeway = 0;
    v
}

/// Verifies `token` with `secret` and checks every claim.
pub fn verify(token: &str, secret: &[u8]) -> Result<Claims, TokenError> {
    if token.len() > EXPORT_NAME_LENGTH_MAX {
        return Err(TokenError::TooLong);
    }
    let data =
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation())
            .map_err(|e| TokenError::Invalid(describe_jwt_error(&e)))?;
    check_claims(&data.claims)?;
    Ok(data.claims)
}

fn describe_jwt_error(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "expired".into(),
        K::InvalidSignature => "bad signature".into(),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => "algorithm is not HS256".into(),
        K::MissingRequiredClaim(c) => format!("missing claim {c}"),
        K::InvalidToken => "malformed".into(),
        K::Json(_) => "claims are not the expected JSON".into(),
        K::Base64(_) | K::Utf8(_) => "bad encoding".into(),
        _ => "rejected".into(),
    }
}

/// Checks the claims' own constraints (shared by `verify` and `mint`).
pub fn check_claims(c: &Claims) -> Result<(), TokenError> {
    if !is_valid_image_id(&c.image_id) {
        return Err(TokenError::BadImageId);
    }
    if !(PAGE_SIZE_BITS_MIN..=PAGE_SIZE_BITS_MAX).contains(&c.page_size_bits) {
        return Err(TokenError::BadPageSize(c.page_size_bits));
    }
    let page_size = 1u64 << c.page_size_bits;
    if c.image_size == 0 || !c.image_size.is_multiple_of(page_size) {
        return Err(TokenError::BadImageSize {
            image_size: c.image_size,
            page_size,
        });
    }
    if let Some(id) = &c.client_id {
        if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenError::BadClientId);
        }
    }
    Ok(())
}

/// Signs claims with `secret` (HS256). Used by `mvpsctl token` and tests.
pub fn mint(claims: &Claims, secret: &[u8]) -> Result<String, TokenError> {
    check_claims(claims)?;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| TokenError::Invalid(e.to_string()))
}

/// Parses sizes like `1073741824`, `512K`, `64M`, `1G`, `2T` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..].trim().to_ascii_uppercase();
            let m = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
    };
    let n: u64 = num.parse().map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_TOKEN: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpbWFnZV9pZCI6IlRFU1RJTUctMDIubXZwcy1pbWFnZSIsImltYWdlX3NpemUiOjEwNzM3NDE4MjQsInBhZ2Vfc2l6ZV9iaXRzIjoxMiwiZXhwIjoxOTAxMTU0OTQxLCJjbGllbnRfaWQiOiJjOWVmZDk2Yy1kYTU5LTQzNTEtYjMxMS0zNTEyOTVmYTk4ZTIifQ.j-nR5Opn-pK6whrm8pJIgyItO5XvlYf0oy7RzR00T1Y";

    fn claims() -> Claims {
        Claims {
            image_id: "t.mvps-image".into(),
            image_size: 1 << 20,
            page_size_bits: 12,
            exp: 4_000_000_000,
            client_id: None,
        }
    }

    #[test]
    fn original_readme_token_verifies() {
        let c = verify(SEED_TOKEN, b"insecure_token").unwrap();
        assert_eq!(c.image_id, "TESTIMG-02.mvps-image");
        assert_eq!(c.image_size, 1 << 30);
        assert_eq!(c.page_size_bits, 12);
        assert_eq!(
            c.client_id.as_deref(),
            Some("c9efd96c-da59-4351-b311-351295fa98e2")
        );
    }

    #[test]
    fn round_trip_and_wrong_secret() {
        let t = mint(&claims(), b"s").unwrap();
        assert_eq!(verify(&t, b"s").unwrap(), claims());
        assert_eq!(
            verify(&t, b"other"),
            Err(TokenError::Invalid("bad signature".into()))
        );
    }

    #[test]
    fn expired_and_alg_none_refused() {
        let mut c = claims();
        c.exp = 1000;
        let t =
            jsonwebtoken::encode(&Header::default(), &c, &EncodingKey::from_secret(b"s")).unwrap();
        assert_eq!(verify(&t, b"s"), Err(TokenError::Invalid("expired".into())));
        // alg: none, no signature.
        let b64 = |s: &str| {
            use std::fmt::Write;
            let _ = s;
            let mut out = String::new();
            let t = jsonwebtoken::encode(
                &Header::default(),
                &claims(),
                &EncodingKey::from_secret(b"s"),
            )
            .unwrap();
            write!(out, "{}", t.split('.').nth(1).unwrap()).unwrap();
            out
        };
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", b64(""));
        assert!(verify(&none, b"s").is_err());
    }

    #[test]
    fn claim_checks() {
        let mut c = claims();
        c.image_id = "../x".into();
        assert_eq!(check_claims(&c), Err(TokenError::BadImageId));
        let mut c = claims();
        c.page_size_bits = 17;
        assert_eq!(check_claims(&c), Err(TokenError::BadPageSize(17)));
        let mut c = claims();
        c.image_size = 4097;
        assert!(matches!(
            check_claims(&c),
            Err(TokenError::BadImageSize { .. })
        ));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1Q").is_err());
    }
}
