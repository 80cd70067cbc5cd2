"""kvsink conformance suite: ``pytest conformance/ --impl ...`` (docs/13-conformance.md)."""
