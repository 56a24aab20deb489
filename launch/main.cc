// The switchyard program.
int main() { return 0; }
