"""The parts of the ingest stage (:mod:`finelake.jobs.ingest` runs them in order): where an input
is (:mod:`.inputs`), a reader per format (:mod:`.readers`), decontamination of queries
(:mod:`.decontamination`), per-partition quality-filter verdicts and token counts (:mod:`.annotate`)
and exact and near-duplicate removal (:mod:`.dedup`)."""
