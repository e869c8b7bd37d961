/* Runs the fuzz harness (fuzz_loader.c) over the files named on the command line, for compilers without
 * libFuzzer: built with AddressSanitizer and UBSan (make fuzz-replay), a test feeds it mutated model files.
 * Prints how many inputs it ran; a memory error aborts with the sanitizer's report. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) { fprintf(stderr, "error: %s: cannot open\n", argv[i]); return 1; }
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        rewind(f);
        uint8_t *data = malloc(size > 0 ? (size_t)size : 1);
        if (!data || fread(data, 1, (size_t)size, f) != (size_t)size) { fprintf(stderr, "error: %s: cannot read\n", argv[i]); return 1; }
        fclose(f);
        LLVMFuzzerTestOneInput(data, (size_t)size);
        free(data);
    }
    printf("ran %d inputs\n", argc - 1);
    return 0;
}
