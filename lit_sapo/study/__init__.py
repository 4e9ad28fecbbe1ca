"""The gate study: sweeps over gates and temperatures, run plots, and the gate stress probe."""
