"""`softserve bench`: one mixed-task workload through softserve's engine and through the peer (HF
transformers generate() per task group, see peer.py), in the same process; one table, the same as JSON."""
