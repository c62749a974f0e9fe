"""What moefy's models are served with: GGUF files for llama.cpp, written by llama.cpp's own converter and measured in llama.cpp."""
