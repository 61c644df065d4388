"""`ca2vdm bench` and the measuring tools the scripts in bench/ share: timers and card ceilings (`timing`), caches
filled with random frames (`caches`), and the engine-level scenarios (`scenarios`)."""
