"""Training-free repair of a cut: a linear map fitted on calibration activations stands in for
each removed run of blocks and is folded into the down projection of the block before the run
("ReplaceMe: Network Simplification via Depth Pruning and Transformer Block Linearization"), so
the repaired model has no new parameters and loads as a plain checkpoint.

`spec` (what was asked, no torch), `fold` (the one formula that puts a map into a weight),
`fit` (the normal equations over calibration windows), `cache` (fitted maps kept on disk).
"""
