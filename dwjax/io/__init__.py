"""Files and directories: weight files, sources, shards, the run directory, assignment files, atomic
writes, locks, default paths. Imports no other role."""
