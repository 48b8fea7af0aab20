//! Image names: what `push` (client and master) and specs accept.

use phoenix_model::spec::check_image_name;

#[test]
fn names_that_would_break_a_listing_or_hide_a_file_are_refused() {
    for bad in [
        "",
        ".hidden",
        "a/b",
        "web\nx",
        "tab\there",
        "nul\0",
        "bell\u{7}",
    ] {
        let reason = check_image_name(bad).expect_err(bad);
        assert!(
            reason.contains("image name") || reason.contains("empty"),
            "{bad:?}: {reason}"
        );
    }
    for good in ["app", "myapp-1.2", "nginx.tar:1.25", "web_2", "ünïcode"] {
        check_image_name(good).unwrap_or_else(|r| panic!("{good:?}: {r}"));
    }
}
