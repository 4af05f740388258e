"""The engine on a ComfyUI model: reference inputs, the writer pass, the reference bank and the attn1 patch."""
