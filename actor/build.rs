//! Links libtorch with an rpath so the binary starts without LD_LIBRARY_PATH,
//! and records what the actor is built from (`flgfn_actor::BUILD`).
//! Actors sample on the CPU only: libtorch_cuda is left out, which saves
//! every actor process its share of CUDA library start-up memory.

include!("../common/build_support/libtorch_rpath.rs");
include!("../common/build_support/provenance.rs");

fn main() {
    link_libtorch_with(false);
    record_provenance_of("actor");
}
