//! The committed header `include/rlx.h` must be what cbindgen generates from `ffi/src`.
//! `RLX_BLESS=1` rewrites it instead (ffi/regen-header.sh).

use std::path::Path;

fn generate(ffi_dir: &Path) -> String {
    let config = cbindgen::Config::from_file(ffi_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    // cbindgen follows lib.rs's `mod` declarations; the header keeps their order.
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(ffi_dir.join("src/lib.rs"))
        .generate()
        .expect("cbindgen failed");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("header is UTF-8")
}

#[test]
fn header_is_up_to_date() {
    let ffi_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let header_path = ffi_dir.join("../include/rlx.h");
    let fresh = generate(ffi_dir);
    if std::env::var_os("RLX_BLESS").is_some() {
        std::fs::write(&header_path, &fresh).expect("write include/rlx.h");
        return;
    }
    let committed = std::fs::read_to_string(&header_path).unwrap_or_default();
    if committed != fresh {
        panic!(
            "include/rlx.h is out of date with ffi/src.\n\
             Regenerate it with:  ffi/regen-header.sh\n\
             (that is: RLX_BLESS=1 cargo test -p rlx-ffi --test header)"
        );
    }
}
