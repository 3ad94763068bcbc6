//! Nothing to use here: this package exists for its examples (see the
//! repository's README). A package needs a target of its own; this is it.
