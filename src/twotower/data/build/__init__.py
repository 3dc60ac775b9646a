"""``twotower data build``: a dataset's split, histories and per-query state computed
out of core, written as Parquet with a checksummed manifest.

    format.py    what a build holds and how it is read back (its readers import only
                 this module)
    engine.py    the Engine interface, the ENGINES registry and build_split, which
                 chooses the engine
    job.py       what a build is asked and what its plan needs of an engine (Database)
    plan.py      the steps, in order, declared once: inputs.py (load and link),
                 parts.py (the split), outputs.py (histories, state, files)
    dialect.py   the few expressions each engine spells its own way
    duckdb.py    the DuckDB engine (one machine, out of core)
    spark.py     the Spark engine (a cluster), tested equal to DuckDB's
    parquet.py   the input files checked, the output files written

The package imports nothing here, so a reader of ``format`` loads no engine.
"""
