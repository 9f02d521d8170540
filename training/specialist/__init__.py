"""Stage S (decouple): one LoRA specialist per modality group, merged to dense weights (`decouple`)."""
