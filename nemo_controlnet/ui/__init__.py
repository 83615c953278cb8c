"""controlnet-ui: a local Gradio app over the same Python APIs as the commands (prep jobs, training
runs as subprocesses, generation); nothing here re-implements them."""
