//! Links libtorch with an rpath so the binary starts without LD_LIBRARY_PATH,
//! and records what the learner is built from (`flgfn_learner::BUILD`).

include!("../common/build_support/libtorch_rpath.rs");
include!("../common/build_support/provenance.rs");

fn main() {
    link_libtorch();
    record_provenance_of("learner");
}
