"""The reports: the study summary, the upcycling report and the merging report, each its tables and plots."""
