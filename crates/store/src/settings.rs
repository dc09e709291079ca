//! Application settings: one JSON value per key (`theme`, `device`, default sampling...).
//!
//! The app owns the keys and the shapes of their values; the store checks only that a value is
//! JSON. Secrets such as the Hugging Face token do not belong here (they go to the OS keyring
//! or a file only the user can read).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::Store;

impl Store {
    /// The value of a setting, or `None` if it was never set. [`Error::SettingValue`] if the
    /// stored JSON does not fit `T` (set it again to replace it).
    pub async fn get_setting<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        const SQL: &str = "SELECT value FROM settings WHERE key = ?";
        let value: Option<String> = sqlx::query_scalar(SQL)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        value
            .map(|json| {
                serde_json::from_str(&json).map_err(|source| Error::SettingValue {
                    key: key.to_owned(),
                    source,
                })
            })
            .transpose()
    }

    /// Sets a setting, replacing any previous value.
    pub async fn set_setting<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        const SQL: &str = "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) \
            ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at";
        let json = serde_json::to_string(value)?;
        sqlx::query(SQL)
            .bind(key)
            .bind(json)
            .bind(self.now().as_millis())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Removes a setting (back to the app's default). Returns whether it was set.
    pub async fn delete_setting(&self, key: &str) -> Result<bool> {
        const SQL: &str = "DELETE FROM settings WHERE key = ?";
        let done = sqlx::query(SQL).bind(key).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }
}
