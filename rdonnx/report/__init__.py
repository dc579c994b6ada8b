"""Report records, the human table, the JSON report and plots."""
