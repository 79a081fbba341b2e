"""Training the models that evolutionary merging starts from (supervised fine-tuning of LMs)."""
