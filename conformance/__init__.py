"""kvsink conformance suite (docs/13-conformance.md): ``pytest --pyargs conformance --impl ...`` from an
installation (``pytest conformance/ --impl ...`` in a checkout); the file route
``python -m conformance.export`` / ``python -m conformance.check_outputs`` for ports without Python."""
