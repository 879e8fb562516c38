//! The aya-backed datapath.
