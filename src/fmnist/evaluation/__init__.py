"""Stage 4, evaluation: metrics, calibration, figures and the report, of a run or of a saved
run folder. A run ends by evaluating itself, so training builds on this stage; nothing here
trains."""
