//! Installs the library the way a user would (scripts/install_c.sh, from the librlx that cargo
//! built for this test), then builds examples/c and examples/cpp with CMake through
//! `find_package(rlx)` — each against the shared and the static library — and examples/c once
//! more through pkg-config, and runs them all on the Llama fixture. The shared C example also
//! runs under valgrind, which must report no leak and no memory error.
//!
//! Each part is skipped, with a message, when its tool (cmake, pkg-config, valgrind, a C/C++
//! compiler) is missing; `.ci/run` installs them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn has(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
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

/// The install prefix, made once per test process.
fn prefix() -> &'static Path {
    static PREFIX: OnceLock<PathBuf> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        let libs = exe.parent().expect("deps dir").to_path_buf();
        let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rlx-prefix");
        let _ = std::fs::remove_dir_all(&prefix);
        run(Command::new("bash")
            .arg(root().join("scripts/install_c.sh"))
            .arg(&prefix)
            .arg(&libs));
        prefix
    })
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/llama-f32")
}

fn run_example(binary: &Path) -> String {
    // As a user runs it: the library comes from the binary's rpath (the install prefix), not
    // from the LD_LIBRARY_PATH cargo sets for tests (which holds cargo's own build outputs).
    let text = run(Command::new(binary)
        .env_remove("LD_LIBRARY_PATH")
        .arg(fixture())
        .arg("Hello there"));
    assert!(text.contains("all checks passed"), "{text}");
    text
}

/// Builds one example folder into its own build tree (`tag` keeps tests that run at the same
/// time apart).
fn cmake_build(example: &str, tag: &str) -> PathBuf {
    let build = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("build-{example}-{tag}"));
    let _ = std::fs::remove_dir_all(&build);
    run(Command::new("cmake")
        .arg("-S")
        .arg(root().join("examples").join(example))
        .arg("-B")
        .arg(&build)
        .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix().display()))
        .arg("-DCMAKE_BUILD_TYPE=Debug"));
    run(Command::new("cmake").arg("--build").arg(&build));
    build
}

fn ready(tools: &[&str]) -> bool {
    if !cfg!(target_os = "linux") {
        println!("skipped: the install script and link lines are written for Linux");
        return false;
    }
    for t in tools {
        if !has(t) {
            println!("skipped: `{t}` is not installed");
            return false;
        }
    }
    true
}

#[test]
fn c_example_with_cmake_shared_and_static() {
    if !ready(&["cmake", "cc"]) {
        return;
    }
    let build = cmake_build("c", "run");
    println!("{}", run_example(&build.join("rlx_example")));
    run_example(&build.join("rlx_example_static"));
    // The static binary does not need librlx.so at run time.
    let needed = run(Command::new("ldd").arg(build.join("rlx_example_static")));
    assert!(!needed.contains("librlx"), "{needed}");
    let needed = run(Command::new("ldd").arg(build.join("rlx_example")));
    assert!(needed.contains("librlx.so"), "{needed}");
}

#[test]
fn cpp_example_with_cmake_shared_and_static() {
    if !ready(&["cmake", "c++"]) {
        return;
    }
    let build = cmake_build("cpp", "run");
    println!("{}", run_example(&build.join("rlx_example_cpp")));
    run_example(&build.join("rlx_example_cpp_static"));
}

#[test]
fn c_example_with_pkg_config() {
    if !ready(&["pkg-config", "cc"]) {
        return;
    }
    let pc_path = prefix().join("lib/pkgconfig");
    let flags = run(Command::new("pkg-config")
        .env("PKG_CONFIG_PATH", &pc_path)
        .args(["--cflags", "--libs", "rlx"]));
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rlx_example_pkgconfig");
    run(Command::new("cc")
        .arg("-std=c99")
        .arg(root().join("examples/c/main.c"))
        .arg("-o")
        .arg(&exe)
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", prefix().join("lib").display()))
        .arg("-lm"));
    run_example(&exe);
}

#[test]
fn c_example_under_valgrind_has_no_leaks_or_errors() {
    if !ready(&["cmake", "cc", "valgrind"]) {
        return;
    }
    let build = cmake_build("c", "valgrind");
    let out = Command::new("valgrind")
        .args([
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--error-exitcode=99",
        ])
        .arg(build.join("rlx_example"))
        .arg(fixture())
        .arg("Hello there")
        // valgrind does not model AVX-512; it hides it from cpuid, and this makes sure.
        .env("RLX_ISA", "avx2")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run valgrind");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "valgrind found a problem:\n{text}");
    assert!(text.contains("all checks passed"), "{text}");
    assert!(text.contains("ERROR SUMMARY: 0 errors"), "{text}");
    assert!(
        text.contains("definitely lost: 0 bytes") || text.contains("All heap blocks were freed"),
        "{text}"
    );
}

/// rlx.hpp without exceptions builds, and a failure is reported through rlx::last_status().
#[test]
fn cpp_header_without_exceptions() {
    if !ready(&["c++"]) {
        return;
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let src = dir.join("rlx_noexcept.cpp");
    std::fs::write(
        &src,
        "#include \"rlx.hpp\"\n\
         int main() {\n\
           rlx::Model m = rlx::Model::load(\"/no/such/model\");\n\
           return (!m && rlx::last_status() != RLX_OK && !rlx::last_message().empty()) ? 0 : 1;\n\
         }\n",
    )
    .unwrap();
    let exe = dir.join("rlx_noexcept");
    let lib = prefix().join("lib");
    run(Command::new("c++")
        .args([
            "-std=c++17",
            "-fno-exceptions",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
        ])
        .arg("-I")
        .arg(prefix().join("include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib.display()))
        .arg("-lrlx")
        .arg(format!("-Wl,-rpath,{}", lib.display())));
    run(Command::new(&exe).env_remove("LD_LIBRARY_PATH"));
}
