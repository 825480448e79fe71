//! Builds `ffi/tests/c/smoke.c` with the system C compiler against the library cargo just built
//! (as librlx.so and as librlx.a) and runs it on the test fixtures. Skipped, with a message, when
//! no C compiler is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let works = Command::new(&cc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    works.then_some(cc)
}

/// Where cargo put librlx.so / librlx.a for this build: next to the test binary (target/<profile>/deps).
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    assert!(
        deps.join(format!(
            "{}rlx{}",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        ))
        .is_file(),
        "no shared librlx in {}: cargo should have built it with this test",
        deps.display()
    );
    deps
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

fn compile(cc: &str, ffi: &Path, out: &Path, link: &[String]) {
    run(Command::new(cc)
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-pedantic",
            "-Werror",
            "-O1",
        ])
        .arg("-I")
        .arg(ffi.join("../include"))
        .arg(ffi.join("tests/c/smoke.c"))
        .arg("-o")
        .arg(out)
        .args(link));
}

fn run_on_fixtures(binary: &Path) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    for name in ["gpt2-f32", "llama-f32"] {
        // The library built with this test first: cargo's LD_LIBRARY_PATH (which outranks the
        // binary's RUNPATH) also lists target/<profile>, where an older librlx.so may sit.
        let mut cmd = Command::new(binary);
        if let Ok(path) = std::env::var("LD_LIBRARY_PATH") {
            cmd.env("LD_LIBRARY_PATH", format!("{}:{path}", lib_dir().display()));
        }
        let text = run(cmd.arg(fixtures.join(name)));
        println!("{name}: {text}");
        assert!(text.contains("all checks passed"), "{text}");
    }
}

#[test]
fn c_program_against_shared_library() {
    let Some(cc) = compiler() else {
        println!("skipped: no C compiler (set CC or install cc)");
        return;
    };
    let ffi = Path::new(env!("CARGO_MANIFEST_DIR"));
    let libs = lib_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rlx_smoke_shared");
    let mut link = vec![
        format!("-L{}", libs.display()),
        "-lrlx".to_owned(),
        "-lm".to_owned(),
    ];
    if cfg!(target_os = "linux") || cfg!(target_os = "macos") {
        link.push(format!("-Wl,-rpath,{}", libs.display()));
    }
    compile(&cc, ffi, &exe, &link);
    run_on_fixtures(&exe);
}

#[test]
fn c_program_against_static_library() {
    let Some(cc) = compiler() else {
        println!("skipped: no C compiler (set CC or install cc)");
        return;
    };
    if !cfg!(target_os = "linux") {
        println!("skipped: the static link line is only written for Linux");
        return;
    }
    let ffi = Path::new(env!("CARGO_MANIFEST_DIR"));
    let archive = lib_dir().join("librlx.a");
    assert!(archive.is_file(), "no {}", archive.display());
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rlx_smoke_static");
    // The system libraries a Rust staticlib needs on Linux (`rustc --print native-static-libs`).
    let mut link = vec![archive.display().to_string()];
    link.extend(
        [
            "-lgcc_s",
            "-lutil",
            "-lrt",
            "-lpthread",
            "-lm",
            "-ldl",
            "-lc",
        ]
        .map(String::from),
    );
    compile(&cc, ffi, &exe, &link);
    run_on_fixtures(&exe);
}

#[test]
fn header_compiles_as_cpp() {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_owned());
    if !Command::new(&cxx)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("skipped: no C++ compiler");
        return;
    }
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("../include/rlx.h");
    run(Command::new(cxx)
        .args([
            "-x",
            "c++",
            "-std=c++11",
            "-Wall",
            "-Wextra",
            "-pedantic",
            "-Werror",
            "-fsyntax-only",
        ])
        .arg(header));
}

/// `ffi/tests/c/misuse.c` built with AddressSanitizer and UndefinedBehaviorSanitizer against the
/// shared library: every misuse comes back as a status, 8 threads sharing a model agree with
/// the sequential run, and the sanitizers (which intercept every malloc/free the library makes)
/// report nothing.
#[test]
fn c_misuse_under_address_sanitizer() {
    let Some(cc) = compiler() else {
        eprintln!("SKIPPED: no C compiler (set CC)");
        return;
    };
    let ffi = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("misuse");
    let lib = lib_dir();
    // Some toolchains lack the sanitizer runtimes: probe with an empty program first.
    let probe_src = dir.path().join("probe.c");
    std::fs::write(&probe_src, "int main(void) { return 0; }\n").unwrap();
    let probe = Command::new(&cc)
        .args(["-fsanitize=address,undefined"])
        .arg(&probe_src)
        .arg("-o")
        .arg(dir.path().join("probe"))
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: {cc} cannot build with -fsanitize=address,undefined");
        return;
    }
    run(Command::new(&cc)
        .args([
            "-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g", "-pthread",
        ])
        .args(["-fsanitize=address,undefined", "-fno-omit-frame-pointer"])
        .arg("-I")
        .arg(ffi.join("../include"))
        .arg(ffi.join("tests/c/misuse.c"))
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lrlx"));
    let fixture = ffi.join("../tests/fixtures/llama-f32");
    let text = run(Command::new(&exe)
        .arg(fixture)
        .env(
            "ASAN_OPTIONS",
            "detect_leaks=1:abort_on_error=0:halt_on_error=1",
        )
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1"));
    assert!(text.contains("all checks held"), "{text}");
    assert!(
        !text.contains("ERROR: AddressSanitizer") && !text.contains("runtime error"),
        "{text}"
    );
}
