// Shared by the build scripts of every crate that links libtorch (included
// with `include!`): makes binaries and test executables find libtorch without
// LD_LIBRARY_PATH, and, with `cuda`, keeps libtorch_cuda linked so CUDA is
// found on GPU machines (the linker would otherwise drop it as unused under
// --as-needed).
#[allow(dead_code)]
fn link_libtorch() {
    link_libtorch_with(true);
}

fn link_libtorch_with(cuda: bool) {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is unset: binaries will need LD_LIBRARY_PATH to find libtorch");
        return;
    };
    // An old-style rpath (DT_RPATH), searched before LD_LIBRARY_PATH: a
    // caller's LD_LIBRARY_PATH naming another libtorch (a conda env, a
    // `module load`) would otherwise win over this one, with symbol errors
    // or silently other behaviour. (deploy/bundle.sh rewrites it as a
    // relative RUNPATH for a bundle, whose environment is its own.)
    println!("cargo:rustc-link-arg=-Wl,--disable-new-dtags,-rpath,{lib_dir}");
    if cuda && std::path::Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
