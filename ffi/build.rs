//! Gives librlx.so a SONAME, so programs linked against it record `librlx.so` (not the path
//! it was linked from) and find it through their rpath or the loader's search path.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,librlx.so");
    }
}
