"""Exchange with the Hugging Face ecosystem: checkpoints in and out, PEFT adapter folders both ways.

    hf_checkpoint.py   load_model / save_model (load_gpt2 / save_gpt2): checkpoints of any family (a folder, a
                       Hub id, a GGUF file) <-> the params tree; the Hub asked once (offline: the cache, or
                       one line saying how to pass a folder)
    peft.py            save_peft / load_peft: adapter_config.json + adapter_model.safetensors
    merged.py          save_merged: a plain checkpoint of the base's family with the adapters folded in
    folders.py         new_folder: every output folder written whole or not at all, by one writer (a killed
                       one's leftovers removed by the next); check_new_folder / check_out_dir at start-up
    gguf.py            read_gguf / gguf_tokenizer: llama.cpp's GGUF files (llama, qwen2) -> a Hugging Face
                       config and float32 tensors under Hugging Face names; smollm2_gguf: the SmolLM2 file

Imports the core (and `jlora.tree`, `jlora.errors`); nothing of training, research or the
command line.
"""
