"""Building blocks shared by families: equalized layers, PatchGAN, LPIPS, the GPT prior."""
