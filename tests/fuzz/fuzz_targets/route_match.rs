//! Route patterns and matching: never a panic; a pattern of literal segments
//! matches exactly its own path (and that path with one trailing slash).
#![no_main]

use keygate::route::{CanonicalPath, PathPattern};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (pattern, path) = text.split_once('\n').unwrap_or((text, "/"));
    let (Ok(pattern), Ok(path)) = (PathPattern::parse(pattern), CanonicalPath::parse(path)) else {
        return;
    };
    let matched = pattern.matches(&path);
    let literal = !pattern.as_str().contains('{') && !pattern.as_str().contains('*');
    if literal {
        let bare = path.as_str().trim_end_matches('/');
        let expected = bare == pattern.as_str() || (bare.is_empty() && pattern.as_str() == "/");
        assert_eq!(matched, expected, "{} vs {}", pattern.as_str(), path.as_str());
    }
});
