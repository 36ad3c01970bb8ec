//! Links libtorch with an rpath so the binary starts without LD_LIBRARY_PATH.

include!("../common/build_support/libtorch_rpath.rs");

fn main() {
    link_libtorch();
}
