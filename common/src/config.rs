//! Loading of TOML config files: unknown fields are rejected and every error names the file.

use std::path::Path;

use serde::de::DeserializeOwned;

/// Why a config file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The file is not valid TOML for this daemon (unknown field, wrong type, bad unit).
    #[error("bad config {path}: {message}")]
    Parse { path: String, message: String },
    /// A field has a value the daemon cannot work with.
    #[error("bad config: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// Reads and parses `path` as TOML into `T` (which should use `#[serde(deny_unknown_fields)]`).
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_toml(&text).map_err(|message| ConfigError::Parse {
        path: path.display().to_string(),
        message,
    })
}

/// Parses TOML text into `T`; the error is one line.
pub fn parse_toml<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| e.message().replace('\n', " ").trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[allow(dead_code)]
        listen: String,
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let err = parse_toml::<Sample>("listen = \"x\"\nlisten_typo = 1\n").unwrap_err();
        assert!(err.contains("listen_typo"), "{err}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = load_toml::<Sample>(Path::new("/nonexistent/sov.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/sov.toml"));
    }
}
