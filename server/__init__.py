"""Everything that runs in the server process: model, cache, engine, API, training (installed as ca2vdm.server)."""
