//! Canonical paths: never a panic; the output is a fixed point and holds none of
//! the forms the parser refuses.
#![no_main]

use keygate::route::CanonicalPath;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(path) = CanonicalPath::parse(text) {
        let again = CanonicalPath::parse(path.as_str()).expect("canonical output parses");
        assert_eq!(again, path, "not idempotent for {text:?}");
        let s = path.as_str();
        assert!(s.starts_with('/'));
        assert!(!s.contains("//"), "{s}");
        assert!(!s.contains(';') && !s.contains('\\'), "{s}");
        for seg in s.split('/') {
            assert!(seg != "." && seg != "..", "{s}");
        }
        let upper = s.to_ascii_uppercase();
        assert!(!upper.contains("%2F") && !upper.contains("%5C") && !upper.contains("%00"), "{s}");
    }
});
