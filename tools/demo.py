"""The end-to-end demo: not yet available."""
print("demo: not yet available (pack -> train -> sweep land in later issues)")
