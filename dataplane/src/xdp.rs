//! XDP steering program loader (work in progress).
