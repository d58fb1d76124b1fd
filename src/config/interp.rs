//! `${env:NAME}` and `${file:PATH}` in string values, so secrets never stand in the YAML.

use std::path::Path;

/// Replaces every `${env:NAME}` and `${file:PATH}` in `value`. Relative file paths
/// are resolved against `base_dir`; a file's trailing newline is trimmed.
pub(super) fn interpolate(
    value: &str,
    base_dir: &Path,
    env: &super::Env,
) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("expected `}` closing `${`".into());
        };
        let reference = &after[..end];
        out.push_str(&resolve(reference, base_dir, env)?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn resolve(reference: &str, base_dir: &Path, env: &super::Env) -> Result<String, String> {
    if let Some(name) = reference.strip_prefix("env:") {
        return env(name).ok_or_else(|| {
            format!("environment variable `{name}` is not set (or not valid UTF-8)")
        });
    }
    if let Some(path) = reference.strip_prefix("file:") {
        let full = base_dir.join(path);
        let text = super::read_capped(&full, super::MAX_SECRET_FILE)
            .map_err(|e| format!("cannot read `{}`: {e}", full.display()))?;
        return Ok(text.trim_end_matches(['\n', '\r']).to_owned());
    }
    Err(format!(
        "expected `${{env:NAME}}` or `${{file:PATH}}`, got `${{{reference}}}`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_cases() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("token"), "s3cret\n").unwrap();
        let env = |name: &str| (name == "KEYGATE_TEST_INTERP").then(|| "from-env".to_owned());
        let cases: &[(&str, Result<&str, ()>)] = &[
            ("plain", Ok("plain")),
            ("${env:KEYGATE_TEST_INTERP}", Ok("from-env")),
            ("a-${env:KEYGATE_TEST_INTERP}-b", Ok("a-from-env-b")),
            ("${file:token}", Ok("s3cret")),
            ("${env:KEYGATE_TEST_UNSET_VARIABLE}", Err(())),
            ("${file:missing}", Err(())),
            ("${vault:x}", Err(())),
            ("${env:X", Err(())),
        ];
        for (input, expected) in cases {
            let got = interpolate(input, dir, &env);
            match expected {
                Ok(want) => assert_eq!(got.as_deref(), Ok(*want), "{input}"),
                Err(()) => assert!(got.is_err(), "{input} gave {got:?}"),
            }
        }
    }
}
