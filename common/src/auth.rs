//! Who is calling (SPEC §6): per-user tokens and the admin and producer bearer keys from
//! configuration.
//!
//! A user token is an HS256 JWT signed with `auth.token_secret`: `sub` is the user id, `exp`
//! comes `auth.token_ttl` after issue, and `ver` is the user's token version (`users.
//! token_version`) when it was issued. Bumping the version (deactivation, erasure, an explicit
//! revoke) invalidates every earlier token of that user at once: [`token_is_current`] is
//! checked on every use. Keys are compared in constant time ([`subtle`]).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::config::AuthSettings;
use crate::UserId;

/// The PostgreSQL `NOTIFY` channel on which a user id is announced whenever that user's
/// tokens are revoked; notifiers listen on it and close that user's streams.
pub const REVOCATIONS_CHANNEL: &str = "upline_token_revocations";

/// An authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Producer,
    User(UserId),
}

/// What a presented credential is, before the user token's version is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// The admin key.
    Admin,
    /// The producer key.
    Producer,
    /// A well-signed, unexpired user token (its version still to be checked).
    User(UserToken),
}

/// The checked content of a user token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserToken {
    pub user_id: UserId,
    /// `users.token_version` when the token was issued.
    pub version: i64,
    /// When it stops being valid.
    pub expires_at: OffsetDateTime,
}

/// Why a credential was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Neither key, nor a token signed with this deployment's secret.
    #[error("these credentials are not valid")]
    Invalid,
    /// A user token past its `exp`: renew it before it expires, or sign in again.
    #[error("the token has expired")]
    Expired,
}

/// A freshly issued user token.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The JWT, for `Authorization: Bearer …`.
    pub token: String,
    pub expires_at: OffsetDateTime,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user id, as a string (RFC 7519 `sub`).
    sub: String,
    /// Issued at, seconds since the epoch.
    iat: i64,
    /// Expires at, seconds since the epoch.
    exp: i64,
    /// The user's token version at issue.
    ver: i64,
}

/// Issues and checks credentials.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
    admin: SecretString,
    producer: SecretString,
}

impl Auth {
    pub fn new(settings: &AuthSettings) -> Self {
        let secret = settings.token_secret.expose_secret().as_bytes();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // Expiry is checked by `verify_user` itself, to tell an expired token from a bad one.
        validation.validate_exp = false;
        Auth {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl: settings.token_ttl,
            admin: settings.admin_token.clone(),
            producer: settings.producer_token.clone(),
        }
    }

    /// A signed token for `user_id` at token version `version`, valid for `auth.token_ttl`.
    pub fn issue(&self, user_id: UserId, version: i64) -> IssuedToken {
        let now = OffsetDateTime::now_utc();
        let expires_at = now + self.ttl;
        let claims = Claims {
            sub: user_id.to_string(),
            iat: now.unix_timestamp(),
            exp: expires_at.unix_timestamp(),
            ver: version,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an HMAC key cannot fail");
        IssuedToken {
            token,
            expires_at: OffsetDateTime::from_unix_timestamp(claims.exp).unwrap_or(expires_at),
        }
    }

    /// The content of a user token whose signature is good and which has not expired.
    ///
    /// # Errors
    /// [`CredentialError::Expired`] at or after its `exp`; [`CredentialError::Invalid`] for
    /// anything else that is not a token of this deployment.
    pub fn verify_user(&self, token: &str) -> Result<UserToken, CredentialError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| CredentialError::Invalid)?;
        let token = UserToken {
            user_id: data
                .claims
                .sub
                .parse()
                .map_err(|_| CredentialError::Invalid)?,
            version: data.claims.ver,
            expires_at: OffsetDateTime::from_unix_timestamp(data.claims.exp)
                .map_err(|_| CredentialError::Invalid)?,
        };
        if token.expires_at <= OffsetDateTime::now_utc() {
            return Err(CredentialError::Expired);
        }
        Ok(token)
    }

    /// What a bearer credential is: the admin key, the producer key, or a user token (whose
    /// version the caller checks with [`token_is_current`]).
    ///
    /// # Errors
    /// As [`Auth::verify_user`].
    pub fn identify(&self, bearer: &str) -> Result<Credential, CredentialError> {
        if constant_time_eq(bearer, &self.admin) {
            Ok(Credential::Admin)
        } else if constant_time_eq(bearer, &self.producer) {
            Ok(Credential::Producer)
        } else {
            self.verify_user(bearer).map(Credential::User)
        }
    }
}

/// Compares a presented key with a configured one without leaking, through timing, how much of
/// it matched.
fn constant_time_eq(presented: &str, key: &SecretString) -> bool {
    presented
        .as_bytes()
        .ct_eq(key.expose_secret().as_bytes())
        .into()
}

/// Whether a user token is still honoured: its user exists, is active, is not erased, and
/// its version is the user's current one.
///
/// # Errors
/// Database errors.
pub async fn token_is_current(db: impl PgExecutor<'_>, token: &UserToken) -> sqlx::Result<bool> {
    let current = sqlx::query_scalar!(
        "select token_version from users where id = $1 and is_active and erased_at is null",
        token.user_id.get()
    )
    .fetch_optional(db)
    .await?;
    Ok(current == Some(token.version))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(secret: &str, ttl: Duration) -> Auth {
        Auth::new(&AuthSettings {
            token_secret: SecretString::from(secret),
            admin_token: SecretString::from("admin-key"),
            producer_token: SecretString::from("producer-key"),
            token_ttl: ttl,
        })
    }

    #[test]
    fn a_user_token_identifies_its_user_and_version_only_with_the_same_secret() {
        let a = auth("one-secret", Duration::from_secs(3600));
        let issued = a.issue(UserId::new(42).expect("positive"), 3);
        let Ok(Credential::User(token)) = a.identify(&issued.token) else {
            panic!("a user token");
        };
        assert_eq!((token.user_id.get(), token.version), (42, 3));
        assert_eq!(token.expires_at, issued.expires_at);
        assert_eq!(
            auth("another-secret", Duration::from_secs(3600)).identify(&issued.token),
            Err(CredentialError::Invalid)
        );
        assert_eq!(a.identify("admin-key"), Ok(Credential::Admin));
        assert_eq!(a.identify("producer-key"), Ok(Credential::Producer));
        assert_eq!(a.identify("admin-ke"), Err(CredentialError::Invalid));
        assert_eq!(a.identify("garbage"), Err(CredentialError::Invalid));
    }

    #[test]
    fn an_expired_token_or_one_without_expiry_is_refused() {
        let a = auth("one-secret", Duration::from_secs(3600));
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "42".into(),
                iat: 0,
                exp: OffsetDateTime::now_utc().unix_timestamp() - 1,
                ver: 0,
            },
            &EncodingKey::from_secret(b"one-secret"),
        )
        .expect("signs");
        assert_eq!(a.identify(&expired), Err(CredentialError::Expired));
        let no_expiry = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "42", "iat": 0}),
            &EncodingKey::from_secret(b"one-secret"),
        )
        .expect("signs");
        assert_eq!(
            a.identify(&no_expiry),
            Err(CredentialError::Invalid),
            "tokens from before expiry existed"
        );
    }
}
