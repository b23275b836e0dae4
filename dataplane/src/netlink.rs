//! Kernel routes and neighbours over netlink (work in progress).
