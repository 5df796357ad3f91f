"""The data path: files -> validated long table -> features -> windows -> grain batches."""
