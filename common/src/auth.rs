//! Who is calling (SPEC §6): per-user tokens (HS256 JWTs signed with `auth.token_secret`,
//! returned at registration) and the admin and producer bearer keys from configuration.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::config::AuthSettings;
use crate::UserId;

/// An authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Producer,
    User(UserId),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user id, as a string (RFC 7519 `sub`).
    sub: String,
    /// Issued at, seconds since the epoch.
    iat: i64,
}

/// Issues and checks credentials.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    admin: String,
    producer: String,
}

impl Auth {
    pub fn new(settings: &AuthSettings) -> Self {
        let secret = settings.token_secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        // User tokens do not expire; they are revoked by rotating auth.token_secret.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        Auth {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            admin: settings.admin_token.expose_secret().to_owned(),
            producer: settings.producer_token.expose_secret().to_owned(),
        }
    }

    /// A signed token for `user_id`.
    pub fn issue(&self, user_id: UserId) -> String {
        let claims = Claims {
            sub: user_id.to_string(),
            iat: time::OffsetDateTime::now_utc().unix_timestamp(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an HMAC key cannot fail")
    }

    /// The user a token was issued to, if its signature is good.
    pub fn verify_user(&self, token: &str) -> Option<UserId> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        data.claims.sub.parse().ok()
    }

    /// Who a bearer credential belongs to: admin key, producer key or user token.
    pub fn identify(&self, bearer: &str) -> Option<Caller> {
        if constant_time_eq(bearer, &self.admin) {
            Some(Caller::Admin)
        } else if constant_time_eq(bearer, &self.producer) {
            Some(Caller::Producer)
        } else {
            self.verify_user(bearer).map(Caller::User)
        }
    }
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn auth(secret: &str) -> Auth {
        Auth::new(&AuthSettings {
            token_secret: SecretString::from(secret),
            admin_token: SecretString::from("admin-key"),
            producer_token: SecretString::from("producer-key"),
        })
    }

    #[test]
    fn a_user_token_identifies_its_user_and_only_with_the_same_secret() {
        let a = auth("one-secret");
        let token = a.issue(42);
        assert_eq!(a.identify(&token), Some(Caller::User(42)));
        assert_eq!(auth("another-secret").identify(&token), None);
        assert_eq!(a.identify("admin-key"), Some(Caller::Admin));
        assert_eq!(a.identify("producer-key"), Some(Caller::Producer));
        assert_eq!(a.identify("garbage"), None);
    }
}
