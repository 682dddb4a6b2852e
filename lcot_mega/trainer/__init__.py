"""The RL driver and the halves of its step (DESIGN.md, "The step").

`driver.train` runs the loop; `collect` samples, grades and (dynamic sampling) keeps informative groups;
`update` selects by polarity and builds the actor's batch; `respond` acts on the guards' verdict; `recovery`
holds what outlives a step; `run_dir` decides fresh start vs resume. Import the modules you need: importing
this package pulls in nothing heavy.
"""
