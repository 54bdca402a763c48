"""Layer 3: write merge results (PEFT LoRA adapter or full weights) and cache them."""
