"""Publishing a gated adapter: `promote` checks it, then hands it to the backend of its target's
kind (`target_for`): a filesystem, an object store, or an OCI registry. A new kind of target is
one more `PromotionTarget`."""
