//! Links libtorch with an rpath so the binary starts without LD_LIBRARY_PATH.
//! Actors sample on the CPU only: libtorch_cuda is left out, which saves
//! every actor process its share of CUDA library start-up memory.

include!("../common/build_support/libtorch_rpath.rs");

fn main() {
    link_libtorch_with(false);
}
