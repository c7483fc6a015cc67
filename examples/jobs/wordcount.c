/* Word count over stdin, as `wc` prints it: lines, words, bytes.
 * An archipel job example: its input object is its stdin, its output object its stdout. */
#include <ctype.h>
#include <stdio.h>

int main(void) {
    unsigned long long lines = 0, words = 0, bytes = 0;
    int in_word = 0;
    unsigned char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        for (size_t i = 0; i < n; i++) {
            unsigned char c = buf[i];
            if (c == '\n') lines++;
            if (isspace(c)) {
                in_word = 0;
            } else if (!in_word) {
                in_word = 1;
                words++;
            }
        }
        bytes += n;
    }
    if (ferror(stdin)) {
        fprintf(stderr, "wordcount: cannot read stdin\n");
        return 1;
    }
    printf("%llu %llu %llu\n", lines, words, bytes);
    return 0;
}
