"""What moefy's models are served with: folders and files other runtimes load unchanged (GGUF for
llama.cpp, written by llama.cpp's own converter; encoders with transformers' remote code)."""
