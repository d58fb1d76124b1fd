//! Configuration parsing and validation: never a panic, whatever the YAML.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |_: &str| None;
    let file = std::path::Path::new("/nonexistent/keygate.yaml");
    if let Ok(config) = keygate::config::from_text(text, file, &env) {
        let _ = config.secrets_with(&env);
    }
});
