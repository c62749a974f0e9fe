"""What moefy's models are served with: folders other runtimes load unchanged."""
